"""The actor side of bulkscore: load a causal LM once, then score shards of questions with it.

Heavy imports (torch, transformers) happen inside the functions that need them, so the driver can
import this package's light modules (`contract`, `embedded`, `actor`) without loading them.
"""
