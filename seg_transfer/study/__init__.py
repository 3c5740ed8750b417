"""Transfer studies (``seg-transfer compare``): arms x training-set sizes x seeds, paired statistics, report."""
