"""Multi-turn chat replay benchmark: vLLM with and without the EMS connector.

Run it with `python -m ems.replay --model DIR --out bench/results/NAME`. The options are in
__main__.py. dataset.py builds the sessions, runner.py runs one engine pass, and report.py
computes the statistics, the plot and the table.
"""
