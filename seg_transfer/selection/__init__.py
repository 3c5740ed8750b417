"""Choosing a source encoder before fine-tuning: LogME scores of candidate encoders on the run's training pixels."""
