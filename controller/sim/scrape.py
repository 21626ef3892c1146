"""Reads a pluginctl process's `/metrics` page for the bench and the soak: their figures
come from what the controller counted, not from its log."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One reading of a `/metrics` page."""

    def __init__(self, text: str) -> None:
        self.samples = [sample for family in text_string_to_metric_families(text)
                        for sample in family.samples]

    def total(self, name: str, **labels: str) -> float:
        """The sum of `name` over every sample whose labels include `labels`."""
        return sum(sample.value for sample in self.samples if sample.name == name
                   and all(sample.labels.get(k) == v for k, v in labels.items()))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """`name` summed per value of `label`, over the samples matching `labels`."""
        sums: dict[str, float] = {}
        for sample in self.samples:
            if sample.name == name and label in sample.labels and all(
                    sample.labels.get(k) == v for k, v in labels.items()):
                key = sample.labels[label]
                sums[key] = sums.get(key, 0.0) + sample.value
        return sums


async def scrape(client: aiohttp.ClientSession, base_url: str) -> Scrape:
    async with client.get(f"{base_url}/metrics") as answer:
        answer.raise_for_status()
        return Scrape(await answer.text())
