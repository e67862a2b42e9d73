{ 'sources': ['cuda_driver.cc', 'nvrtc.cc', 'cuda_backend.cc'] }
