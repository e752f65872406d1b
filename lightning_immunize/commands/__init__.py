"""One file per ``lightning-immunize`` command, each holding its parser and its logic:
:mod:`~lightning_immunize.commands.fit` (LightningCLI's ``fit``, ``validate``, ``test``),
:mod:`~lightning_immunize.commands.evaluate`, :mod:`~lightning_immunize.commands.attack`,
:mod:`~lightning_immunize.commands.export` and :mod:`~lightning_immunize.commands.reproduce`.

Each module imports only the standard library (and yaml) at the top, so building a parser
stays fast; torch, Lightning and timm load once a command runs.
"""
