"""ViT models, Ray Train pretraining and fine-tuning, checkpoints that resume exactly."""
