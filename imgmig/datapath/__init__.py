"""The data path: where image bytes are captured, stored, forwarded, received and served."""
