"""What the programs share, between them and the core (DESIGN.md section 1).

Programs (webhook, extender, controller, nodeagent) import this layer; it imports the
core and :mod:`powercap.kube`, never a program. Modules:

- :mod:`~powercap.runtime.cliargs`: argparse ``type=`` functions and the flags several
  programs share;
- :mod:`~powercap.runtime.documents`: YAML/JSON documents from files, with load errors
  worded for people;
- :mod:`~powercap.runtime.filewatch`: has a file changed (certificates, snapshots, policy files);
- :mod:`~powercap.runtime.httpserver`: the probes, metrics and status server;
- :mod:`~powercap.runtime.httpworker`: the gunicorn worker that reads each request whole in
  an event loop before a thread runs it, so slow or idle clients hold no thread;
- :mod:`~powercap.runtime.jsonlimits`: nesting, entry and value limits checked on the raw
  JSON bytes, before anything is decoded;
- :mod:`~powercap.runtime.logs`: JSON-lines logging;
- :mod:`~powercap.runtime.sources`: cluster-view sources (watch caches or a state file);
- :mod:`~powercap.runtime.wsgi`: gunicorn configured in code, with the JSON log set-up.
"""
