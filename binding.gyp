{
  # The canonical native build (node-gyp, prebuildify and node-gyp-build drive it).
  # Each area lists its own sources in a sources.gypi next to them; CMakeLists.txt
  # reads the same files, so there is one list of sources.
  'targets': [{
    'target_name': 'elasticmoe',
    'includes': [
      'native/core/sources.gypi',
      'native/backends/cuda/sources.gypi',
      'native/backends/acl/sources.gypi',
      'native/backends/mock/sources.gypi',
      'native/napi/sources.gypi',
    ],
    'include_dirs': [
      "<!(node -p \"require('node-addon-api').include_dir\")",
      'native',
    ],
    'defines': ['NAPI_VERSION=8', 'NODE_ADDON_API_DISABLE_DEPRECATED', 'NAPI_CPP_EXCEPTIONS'],
    'cflags!': ['-fno-exceptions'],
    'cflags_cc!': ['-fno-exceptions', '-fno-rtti'],
    'cflags_cc': ['-std=c++17', '-fexceptions', '-frtti', '-Wall', '-Wextra', '-Wno-unused-parameter', '-O2', '-pthread'],
    'libraries': ['-ldl', '-pthread'],
  }],
}
