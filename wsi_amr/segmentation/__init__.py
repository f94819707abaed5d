"""The segmenters: the token transformer (quadtree leaves in) and the U-Net baseline (pixels in),
class probabilities per pixel out.

``config`` (architecture and training settings) → ``model`` (the networks, ``unet`` the U-Net's,
their card, loading a checkpoint by its ``arch``) → ``predict`` (an image or a slide window through the model) → ``windows`` (a whole
slide as overlapping windows, blended, outlined as polygons). Training: ``data`` (labelled images
and slides) → ``augment`` (batches) → ``train`` (the loop, on :mod:`wsi_amr.trainer`). Predicting
never imports training.
"""
