"""Training: losses, one epoch, one fold (`FoldTrainer`), a whole run."""
