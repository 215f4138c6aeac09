"""What uses the library: the bench and its report, the paper's numbers, the demo, prediction, plots."""
