"""cxr_tfdata: tf.data pipelines, the ResNet50V2 model, training and evaluation for chest X-rays."""

__version__ = "0.1.0"
