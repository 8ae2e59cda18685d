"""Multi-turn chat replay benchmark: vLLM with and without the EMS connector.

Run with `python -m ems.replay --model DIR --out bench/results/NAME`; see __main__.py for the
options, dataset.py for how sessions are built, runner.py for one engine pass and report.py for
the statistics, the plot and the table.
"""
