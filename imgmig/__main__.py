"""`python3 -m imgmig proxy|cache ARGS` runs a daemon from a source tree; anything else is `imgmig`."""

import sys

from imgmig.commands.cli import cache_main, main, proxy_main

ROLES = {"proxy": proxy_main, "cache": cache_main}

if len(sys.argv) > 1 and sys.argv[1] in ROLES:
    sys.exit(ROLES[sys.argv[1]](sys.argv[2:]))
sys.exit(main())
