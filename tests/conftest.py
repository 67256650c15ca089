# Put the repo root on sys.path so tests import the flat top-level modules
# (data, tokenizer_pca, ...).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
