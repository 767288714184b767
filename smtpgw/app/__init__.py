"""The program: the gateway process that wires the stages, the command line, the control directory, memory reports.

Owns: start-up, shutdown, reload, signals and hand-offs between stages. Must never: decide what a stage decides.
"""
