"""amid-ray: hyperparameter search for AMiD knowledge distillation of LLMs on Ray."""

__version__ = "0.1.0"
