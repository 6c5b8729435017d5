"""``p2pz.configs``: the YAML configs of ``p2pz train`` and ``p2pz generate``, shipped as package data.

A package (not only a folder) so that ``importlib.resources.files("p2pz.configs")`` finds them in an
editable install as in a wheel; ``p2pz demo`` trains with ``cpu.yaml`` from here.
"""
