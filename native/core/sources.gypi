{ 'sources': ['status.cc', 'dynlib.cc', 'backend.cc', 'registry.cc'] }
