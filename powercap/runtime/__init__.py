"""What the programs share, between them and the core (DESIGN.md section 1).

Programs (webhook, extender, controller, nodeagent) import this layer; it imports the
core and :mod:`powercap.kube`, never a program. Modules:

- :mod:`~powercap.runtime.cliargs`: argparse ``type=`` functions;
- :mod:`~powercap.runtime.documents`: YAML/JSON documents from files, with load errors
  worded for people;
- :mod:`~powercap.runtime.logs`: JSON-lines logging;
- :mod:`~powercap.runtime.sources`: cluster-view sources (watch caches or a state file).
"""
