"""What wants to run: resources, the data it touches, and how the user wants it placed."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hybridray.topology.models import DataClass


class WorkloadKind(str, enum.Enum):
    """What Ray construct the workload becomes; it decides which options are compiled."""

    task = "task"
    actor = "actor"
    train = "train"      # a Ray Train worker group; ``count`` is the number of workers
    serve = "serve"      # a Serve deployment; ``count`` is the number of replicas
    data = "data"        # a Ray Data stage
    job = "job"          # a job entrypoint (``ray job submit``)


class Preference(str, enum.Enum):
    """How allowed sites are ordered; the first is tried first, the rest are fallbacks."""

    cheapest = "cheapest"            # lowest estimated cost (compute + egress of its data)
    onprem_first = "onprem-first"    # on-prem/private sites first, then burst to cloud by cost
    near_data = "near-data"          # the data's own site, then sites with the fastest link to it
    fastest = "fastest"              # most free capacity now, then bandwidth to the data
    site = "site"                    # a named site (``site=``), then others if ``burst``


class Workload(BaseModel):
    """A unit of work to place. Plain data: build it in Python or from a dict/YAML.

    ``data_classes`` lists every class of data the work reads or writes; placement uses the
    highest. ``count`` units (workers, replicas) each need ``cpus``/``gpus``/``memory_gb``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("workload", min_length=1, max_length=200)
    kind: WorkloadKind = WorkloadKind.task
    cpus: float = Field(1.0, ge=0, le=4096)
    gpus: float = Field(0.0, ge=0, le=64)
    accelerator: str | None = None
    memory_gb: float = Field(0.0, ge=0, le=65536)
    count: int = Field(1, ge=1, le=100_000)
    data_classes: tuple[DataClass, ...] = ()
    data_site: str | None = Field(None, description="Site where the input data lives.")
    data_bytes: int = Field(0, ge=0, description="Bytes of input that must reach the workers.")
    expected_hours: float = Field(1.0, gt=0, le=100_000, description="For cost estimates.")
    preference: Preference = Preference.cheapest
    site: str | None = Field(None, description="The site for preference=site.")
    burst: bool = Field(True, description="Allow fallback to other allowed sites when full.")
    spot_ok: bool = Field(True, description="Allow spot/preemptible pools.")
    class_defaulted: bool = Field(
        False, description="Set by the policy when data_classes was empty and the cluster's "
                           "default_data_class was taken instead (recorded in the audit log).")
    queue: bool = Field(False, description="Wait for room that actors and placement groups "
                        "hold now, instead of being refused (capacity rule); the wait is "
                        "reported and has a deadline ($HYBRIDRAY_WAIT_TIMEOUT_S).")

    @field_validator("data_classes", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if isinstance(value, (str, DataClass)):
            return (value,)
        return value

    @model_validator(mode="after")
    def _site_given(self) -> Workload:
        if self.preference is Preference.site and not self.site:
            raise ValueError("preference 'site' needs site=NAME")
        if self.site and self.preference not in (Preference.site,):
            object.__setattr__(self, "preference", Preference.site)
        return self

    @property
    def data_class(self) -> DataClass:
        """The highest class the workload touches.

        An undeclared workload (no ``data_classes``) is placed with the cluster's
        ``default_data_class`` (``decide`` fills it in); read here before that, it is
        restricted: deny by default, never public.
        """
        return max(self.data_classes, default=DataClass.restricted)
