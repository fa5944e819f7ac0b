"""Using a finished run: opening it, OOF evaluation, ensemble prediction and submissions, the ridge probe, report."""
