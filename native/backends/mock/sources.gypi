{ 'sources': ['mock_backend.cc', 'mock_kernels.cc', 'fill_kernels.cc', 'model_kernels.cc'] }
