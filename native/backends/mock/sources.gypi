{ 'sources': ['mock_backend.cc', 'mock_kernels.cc'] }
