{ 'sources': ['mock_backend.cc', 'mock_kernels.cc', 'fill_kernels.cc'] }
