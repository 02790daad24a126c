"""stub"""
class LocalResolutionResult: pass
def local_resolution(): pass
