"""Everything pure: the replica and what each host's kernel should hold (a plan), computed from it.

No module here does I/O; the agent feeds it a replica and hands the plan to `tether.dataplane`."""
