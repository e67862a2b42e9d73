{ 'sources': ['acl_api.cc', 'acl_backend.cc'] }
