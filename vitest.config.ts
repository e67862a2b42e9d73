import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // Native code runs in the tests: a crash must take down one fork, not the runner.
    pool: 'forks',
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    env: { ELASTICMOE_NO_WARN_MOCK: '1' },
  },
});
