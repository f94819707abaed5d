"""Iterative Patch Selection: classify a slide in bounded memory.

``config`` (architecture and selection sizes) → ``model`` (encoder, selection, the attention
head, save and load) → ``bags`` (a slide, image or feature file as a bag of patches) →
``predict`` (a bag streamed through the model, its attention) → ``train`` (the loop, on
:mod:`wsi_amr.trainer`). Predicting never imports training.
"""
