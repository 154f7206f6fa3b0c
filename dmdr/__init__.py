"""dmdr: Distribution Matching Distillation meets Reinforcement Learning."""
__version__ = "0.1.0"
