"""Orchestration: typed run and study directories, one data-preparation path, train / audit /
train-and-audit / sweep / attack, and the executors that run independent jobs. The CLI and the public Python
API (``privaudit.train``, ``privaudit.audit``, ...) both call into this package.

Importing it imports neither torch nor tensorflow.
"""

from privaudit.study.api import attack, audit, load_audit, report, sweep, train, train_and_audit
from privaudit.study.data import DataSpec, PreparedData, prepare_data
from privaudit.study.dirs import RunDir, StudyDir

__all__ = ["train", "audit", "train_and_audit", "sweep", "attack", "report", "load_audit", "RunDir", "StudyDir",
           "DataSpec", "PreparedData", "prepare_data"]
