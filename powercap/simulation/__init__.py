"""The cluster simulator: the whole system on simulated GPUs, in simulated time.

- :mod:`~powercap.simulation.scenario`: the scenario format, validation, typed scenario;
- :mod:`~powercap.simulation.workload`: the request trace (daily shape, bursts, noise) and
  how a service's traffic is split over its pods;
- :mod:`~powercap.simulation.tracefile`: recorded traffic (Azure LLM inference trace CSV,
  tokens/s samples) parsed from a file's text, for services that replay it;
- :mod:`~powercap.simulation.world`: simulated GPUs, nodes, racks (inlet model) and pods,
  rendered as the Kubernetes objects the services read;
- :mod:`~powercap.simulation.decisions`: the real placement, allocation and control-law
  calls, with the inputs the services build;
- :mod:`~powercap.simulation.engine`: the time loop and the three strategies;
- :mod:`~powercap.simulation.metrics` and :mod:`~powercap.simulation.summary`: per-second
  records and the figures of ``summary.json``.

Pure: no I/O (trace files are read by a reader the caller passes), no clock (the caller may pass one to time runs), no plotting; the
``powercap simulate`` command (:mod:`powercap.simulation.cli`) does those.
"""
