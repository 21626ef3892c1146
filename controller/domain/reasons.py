"""Why desired state cannot be used: the reasons that travel beside the prose message, from
desired-state validation (domain.desired) to the status a user reads (kube.conditions maps
each to a Kubernetes condition reason, once). Pure values; messages may be reworded freely,
reasons may not."""

from __future__ import annotations

import enum


class InvalidReason(enum.StrEnum):
    """Why one object (or a whole file) of desired state is unusable."""

    UNREADABLE = "unreadable"  # a manifest file that cannot be read or parsed
    NOT_A_MAPPING = "not_a_mapping"  # a YAML document that is not an object
    FOREIGN_VERSION = "foreign_version"  # our API group, but not a version or kind we serve
    BAD_METADATA = "bad_metadata"  # metadata.name or metadata.namespace unusable
    BAD_SPEC = "bad_spec"  # the spec does not validate against its schema
    DEFINED_TWICE = "defined_twice"  # one WorkspaceTemplate defined twice in one source
    BAD_WORKSPACE_ID = "bad_workspace_id"
    BAD_PLUGIN = "bad_plugin"  # a plugin entry of the Workspace's own spec
    CONFLICTING_PLUGIN = "conflicting_plugin"  # one name declared twice, different sources
    TEMPLATE_NOT_FOUND = "template_not_found"
    TEMPLATE_INVALID = "template_invalid"  # the referenced template has bad entries
    DUPLICATE_WORKSPACE_ID = "duplicate_workspace_id"  # another object claimed the id first
