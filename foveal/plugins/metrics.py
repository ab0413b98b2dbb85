"""Metrics: faithfulness and localisation of explanations, segmentation overlap."""

from ..metrics.explanation import (
    ROAD,
    AverageDrop,
    AverageGain,
    AverageIncrease,
    Deletion,
    Insertion,
    PercentageIn,
    PerturbationAUC,
)
from ..metrics.localisation import PointingGame, SaliencySegmentation
from ..metrics.segmentation import Dice, IoU, MeanDice, MeanIoU
from ..registry import hookimpl


@hookimpl
def register_components(register):
    register("average-drop", AverageDrop)
    register("average-increase", AverageIncrease)
    register("average-gain", AverageGain)
    register("insertion", Insertion)
    register("deletion", Deletion)
    register("percentage-in", PercentageIn)
    register("perturbation-auc", PerturbationAUC)
    register("road", ROAD)
    register("pointing-game", PointingGame)
    register("saliency-segmentation", SaliencySegmentation)
    register("dice", Dice)
    register("iou", IoU)
    register("mean-dice", MeanDice)
    register("mean-iou", MeanIoU)
