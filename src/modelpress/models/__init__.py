"""Small reference models with their data, for tests, benchmarks and examples."""

from modelpress.models.digits import Digits, DigitsCNN, accuracy, load_digits_data, train

__all__ = ["Digits", "DigitsCNN", "accuracy", "load_digits_data", "train"]
