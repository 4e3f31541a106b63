"""Eval-set near-duplicate removal: perceptual-hash index, fast search, verification, audit."""
