"""Adapters from other libraries' model code to mxmoe layers (``mxmoe.integrations.transformers``).

Each adapter imports its library lazily: importing mxmoe never imports transformers.
"""
