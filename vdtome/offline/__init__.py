"""Built-in small models: tiny pipelines of the real diffusers classes, the coloured-shapes world and
the training that made tiny-shapes (``python -m vdtome.offline.train``)."""
