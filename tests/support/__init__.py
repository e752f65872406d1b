"""Helpers the tests share (``support.helpers``) and the fault-injection callbacks a
``lightning-immunize`` subprocess imports from configs (``fault_callbacks``)."""
