"""Training: pretraining now; fine-tuning recipes reuse the same loop pieces."""
