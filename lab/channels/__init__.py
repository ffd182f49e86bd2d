"""Proprioceptive channels (tinyMARS re-implemented): six state channels -- memory, affect, time, ethics,
identity, continuity -- injected into every layer of a base through ReZero gates that start at 0.

    from lab.channels import Config, run, train_or_load, evaluate
    report = run(Config.preset("smoke"))         # train what is missing, evaluate, probe: one Report
    model = train_or_load(config, base)          # the adapter track: only the injection trains
    report = evaluate(model)                     # held-out, judge-free, tests that can fail

Modules: config (Config and its presets), injection (the gates, via lab.hooks), encoders (state -> vectors),
data (counterfactual corpus, responses, validation split, document states), model (ChannelModel), train (adapter, text arm, native track), evaluate (metrics,
the report, `run`), probes (alpha, captum, log-prob shifts), cli (`lab train channels`, `lab evaluate channels`).
"""

from lab.channels.config import Config
from lab.channels.data import CAPABILITIES
from lab.channels.encoders import ChannelState, TextEncoder
from lab.channels.evaluate import evaluate, run, write_lexicons
from lab.channels.injection import CHANNELS, ChannelInjector, inject
from lab.channels.model import ChannelModel, build
from lab.channels.train import Controls, load, train, train_controls, train_native, train_or_load

__all__ = ["Config", "build", "train", "load", "train_or_load", "train_controls", "train_native", "Controls",
           "evaluate", "run", "write_lexicons", "ChannelModel", "ChannelInjector", "ChannelState", "TextEncoder",
           "inject", "CHANNELS", "CAPABILITIES"]
