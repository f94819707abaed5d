"""The token segmenter: quadtree leaves in, class probabilities per pixel out.

``config`` (architecture and training settings) → ``model`` (the network, its card, loading a
checkpoint) → ``predict`` (an image or a slide window through the model) → ``windows`` (a whole
slide as overlapping windows, blended, outlined as polygons). Training: ``data`` (labelled images
and slides) → ``augment`` (batches) → ``train`` (the loop, on :mod:`wsi_amr.trainer`). Predicting
never imports training.
"""
