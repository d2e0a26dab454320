"""headswap: fine-tune pretrained Keras image classifiers on your own image folders."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) hides the run's own log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
