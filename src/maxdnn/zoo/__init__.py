"""The model zoo: ResNet-8 and ResNet-20 for CIFAR-10, their committed checkpoints, MLPerf Tiny's Keras import,
training (``train``) and ``load_model`` (any model file by its suffix)."""
