"""Tiny example datasets for the commands shown in the READMEs.

A README command that reads user data writes the path as ``data/<name>``; the task's module here
(``tests/docs_examples/<task>.py``) writes that dataset, in the exact layout the README
describes, with ``write(name, dest)``, and ``TINY`` holds the CLI overrides that make a
fit/validate/test/predict of the task's configs finish in seconds. ``tests/test_docs.py`` runs
every README command with them.
"""
