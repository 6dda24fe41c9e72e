"""cifar-dist: distributed CIFAR-10/100 training."""

__version__ = "0.1.0"
