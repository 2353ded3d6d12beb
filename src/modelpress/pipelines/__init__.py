"""Pipelines that need more than a recipe (training data, retraining loops), built on compress, save and load."""
