"""Angular assignment: projection matching (polar-Fourier global search + local refinement) and
DeepAlign-style learned region recognition. PyTorch is imported only by :mod:`.deepalign`.
"""
from .projmatch import AlignmentResult, ProjectionMatcher
from .search_plan import SearchPlan, ctf_values, plan_search
from .refine import RefineLevel, refine_candidates

__all__ = ["AlignmentResult", "ProjectionMatcher", "SearchPlan", "ctf_values", "plan_search", "RefineLevel",
           "refine_candidates"]
