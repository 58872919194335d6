"""RobustMedSAM engine: degradation-resilient prompt-based medical image segmentation.

Importing this package is cheap and needs neither torch nor Qt/Slicer; submodules import what they need.
"""
__version__ = "0.1.0"
