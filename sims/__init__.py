"""diffsteer.sims: the low-dimensional experiments of the three papers. Each experiment is a function
of a frozen config dataclass that returns plain data; figures are drawn from that data and registered
in :mod:`sims.registry` so that ``diffsteer figures`` regenerates them all."""
