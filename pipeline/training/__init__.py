"""Learning from labels: read labels (labels), read a scored output's embeddings (scored), train a head
in the LAION file formats (train_head), and pick images to label next (active)."""
